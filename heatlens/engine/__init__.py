"""The engine every method runs on: the entry checks of a call, hooks and capture for one forward
pass, layer choice, token layouts, attention capture, targets, map math and the memory budget.

Nothing here knows a particular method; :mod:`heatlens.methods` builds on it.
"""
