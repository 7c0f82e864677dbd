"""Floor 3: plan x analysis -> sizes, forms and block orders, and every "no" before
anything is built. ``width`` (``Resolution``), ``depth`` (stack growth orders) and
``rewrite`` (``NodeRewrite``: what a rule may read and record in its rewrite half)."""
