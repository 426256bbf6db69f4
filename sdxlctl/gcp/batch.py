"""Vertex AI batch prediction jobs through the JobService GAPIC clients (v1; v1beta1 for Spot).
STUB (issue 18, H3)."""

from __future__ import annotations
