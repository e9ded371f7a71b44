"""Tests of medssl.methods."""
