"""Next-slice policies: pure functions of the observation history and the recipe's bounds (one module
each). `policy = "fixed"` is the baseline and decides nothing."""
