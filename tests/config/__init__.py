"""Tests of medssl.config, medssl.typed_config and medssl.errors."""
