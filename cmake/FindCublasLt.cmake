# Finds cuBLASLt and sets RTLLM_CUBLASLT to a target to link, or leaves it empty.
# Looks in the CUDA toolkit first, then in RTLLM_CUBLAS_ROOT (a directory with include/cublasLt.h and
# lib/libcublasLt.so*; also read from the environment), then in the nvidia-cublas Python wheel of the
# interpreter that builds rtllm.
set(RTLLM_CUBLASLT "")
if(TARGET CUDA::cublasLt)
  set(RTLLM_CUBLASLT CUDA::cublasLt)
  return()
endif()

if(NOT RTLLM_CUBLAS_ROOT AND DEFINED ENV{RTLLM_CUBLAS_ROOT})
  set(RTLLM_CUBLAS_ROOT "$ENV{RTLLM_CUBLAS_ROOT}")
endif()
if(NOT RTLLM_CUBLAS_ROOT)
  find_package(Python COMPONENTS Interpreter QUIET)
  if(Python_EXECUTABLE)
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c
        "import os, nvidia; print(next(p for d in nvidia.__path__ for p in (os.path.join(d, 'cu13'), os.path.join(d, 'cublas')) if os.path.exists(os.path.join(p, 'include', 'cublasLt.h'))))"
      OUTPUT_VARIABLE RTLLM_CUBLAS_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
endif()

find_path(RTLLM_CUBLASLT_INCLUDE_DIR cublasLt.h HINTS ${RTLLM_CUBLAS_ROOT}/include NO_DEFAULT_PATH)
find_library(RTLLM_CUBLASLT_LIBRARY NAMES cublasLt libcublasLt.so.13 libcublasLt.so.12
             HINTS ${RTLLM_CUBLAS_ROOT}/lib NO_DEFAULT_PATH)
if(RTLLM_CUBLASLT_INCLUDE_DIR AND RTLLM_CUBLASLT_LIBRARY)
  add_library(rtllm_cublaslt SHARED IMPORTED)
  set_target_properties(rtllm_cublaslt PROPERTIES
    IMPORTED_LOCATION "${RTLLM_CUBLASLT_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${RTLLM_CUBLASLT_INCLUDE_DIR}")
  set(RTLLM_CUBLASLT rtllm_cublaslt)
  message(STATUS "rtllm: cuBLASLt ${RTLLM_CUBLASLT_LIBRARY}")
endif()
