"""Tests of medssl.cli."""
