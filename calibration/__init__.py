"""Hardware profiles (TOML, every number with its source) and, later, fitting of measured curves."""
