"""Pictures of explanations: heatmap overlays and grids, signed attribution pictures, concept
colourings and boxes. matplotlib is imported only by the modules that draw with it."""
