"""Tests of medssl.data."""
