"""Floor 0: the axis algebra (``dims``), LEMON's expansion maps and noise (``expansion``),
and the typed vocabularies of forms, roles and hints (``vocabulary``). Imports no other
floor."""
