"""The `editfarm` command line: runs the API, workers and a whole local cluster."""
