"""Tests of medssl.advise."""
