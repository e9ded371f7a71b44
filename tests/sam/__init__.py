"""Tests of medssl.sam."""
