"""Which map can I trust? Faithfulness, localisation, robustness and sanity metrics of
explanations, with model-blind controls, behind :func:`heatlens.evaluate`."""
