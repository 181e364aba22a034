"""Deployment and measurement: OpenVINO exports, timing, memory and cost counting, benchmark reports."""
