"""The acceleration report: measuring size, speed and quality of every artifact, and the AccelerationReport callback."""

from lightning_accel.report.build import build_report
from lightning_accel.report.callback import AccelerationReport
from lightning_accel.report.measure import count_macs

__all__ = ["AccelerationReport", "build_report", "count_macs"]
