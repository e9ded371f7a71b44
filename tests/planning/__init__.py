"""Tests of medssl.planning."""
