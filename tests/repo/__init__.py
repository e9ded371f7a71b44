"""Repository-wide checks: import layers, links in docs, forbidden packages, presets against their data, scripts."""
