"""Floor 4: the recipe. ``recipe`` (``GrowthRecipe``: per grown tensor, its source and
steps; apply in memory or streamed; JSON), ``transforms`` (the table of named parameter
transforms the rules fill) and ``safetensors_io`` (checkpoints read and written one
tensor at a time)."""
