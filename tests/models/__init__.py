"""Tests of medssl.models."""
