"""Batch jobs run with `ray job submit`: bulk enrolment (enroll.py)."""
