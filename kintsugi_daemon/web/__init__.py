"""`kintsugi web`: the live page (its own process; the daemon never imports it)."""
