"""Tests of medssl.report."""
