"""Private helpers shared by every technique; this package imports no other lightning_accel package."""
