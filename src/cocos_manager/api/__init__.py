"""The gRPC face: the servicer that maps requests and errors, its interceptors, the server, and the dial-out client of a computations server."""
