"""Tests of medssl.evaluation."""
