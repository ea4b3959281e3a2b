"""The HTTP edges: read app, control app, request/response models, peer credentials, servers."""
