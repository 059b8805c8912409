"""The long-running service: wiring, signals and sd_notify; the MQTT link and its topic/payload models;
the SQLite journal; run storage and atomic writes."""
