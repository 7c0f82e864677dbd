"""Floor 2: what a graph allows. ``rule`` (the Rule base class) and ``registry`` (the table
type; no default instance lives here), ``width`` (the width analysis: every node asks its
rule), ``groups`` (width groups and roles), ``stacks`` (block stacks for depth, asking
the rules which node ends a residual branch) and ``report`` (``inspect``'s report). The
registry is always a parameter."""
