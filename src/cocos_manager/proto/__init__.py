"""Generated gRPC code: run `make proto` after editing proto/manager.proto."""
