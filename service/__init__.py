"""medcurate's HTTP service: a Ray Serve app (``service.app``) over the workspace and Ray Jobs."""
