"""What operators read: the admin endpoint, metrics, the workers' admin, the container probe."""
