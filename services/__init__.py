# gRPC core reads its experiments when grpc is first imported: set them before any module
# of this package imports grpc.
from shared import grpc_env

grpc_env.apply()
