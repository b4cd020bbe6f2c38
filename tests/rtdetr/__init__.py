"""Tests of the rtdetr package."""
