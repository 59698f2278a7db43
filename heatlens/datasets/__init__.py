"""Whole data sets: ``heatlens.explain_dataset`` and ``heatlens explain-dir`` explain every image
of a folder, a list or a Dataset into a run folder that survives interruption and resumes, and
``heatlens.load_run`` reads it back.

``sources`` (what to explain), ``reading`` (decode in workers), ``compute`` (one batch, the same
for every engine), ``store`` (the run folder, written in whole chunks), ``results`` (reading a
run), ``runner`` (the local engine and the front door), ``on_ray`` (the Ray engine),
``summary`` (the mean map per class).
"""
