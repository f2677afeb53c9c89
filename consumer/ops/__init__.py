"""Operating the service: the control plane (durable pauses, the control API) and the rewind command."""
