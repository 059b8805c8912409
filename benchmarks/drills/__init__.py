"""Drills: the daemon killed, starved, doubled or flooded on purpose, every part real (Mosquitto with its
ACL, the simulator process, `kintsugi serve` as its own process). Each drill returns a report; the tests
in tests/drills/ run them at CI counts and assert on the reports, `python -m benchmarks.drills` runs them
at full counts and prints the figures."""
