"""Tests of medssl.engine."""
