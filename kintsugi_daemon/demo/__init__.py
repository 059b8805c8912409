"""The demo harness (`kintsugi demo`) and the launchers it shares with tests and benchmarks: a private
broker and the simulator as its own process."""
