# Cython declarations of include/xvf/*.h (one .pxd per header) and of the system
# calls the extensions make (system.pxd). Nothing here is compiled on its own.
