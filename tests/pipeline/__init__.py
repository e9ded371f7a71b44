"""Tests of medssl.pipeline."""
