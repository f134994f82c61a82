# Finds the llama.cpp that llama-cpp-python installs and checks it is the pinned one.
#
# llama-cpp-python built from its sdist puts, besides llama_cpp/lib/*.so, headers in
# site-packages/include and CMake package configs in site-packages/lib/cmake/{llama,ggml}.
# That layout is a side effect of its build, not an API, so every piece is checked here.
set(SPECEE_LLAMA_CPP_PYTHON_VERSION "0.3.36")
set(SPECEE_LLAMA_CPP_COMMIT "0c1e570")
set(_specee_install_hint
    "Install it first:  CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install llama-cpp-python==${SPECEE_LLAMA_CPP_PYTHON_VERSION}")

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import importlib.metadata as m, importlib.util as u, os; s = u.find_spec('llama_cpp'); print(m.version('llama-cpp-python') + ';' + os.path.dirname(os.path.dirname(s.origin)))"
  OUTPUT_VARIABLE _specee_probe
  RESULT_VARIABLE _specee_probe_rc
  ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _specee_probe_rc EQUAL 0)
  message(FATAL_ERROR "specee-pc: llama-cpp-python is not installed for ${Python_EXECUTABLE}. ${_specee_install_hint}")
endif()
list(GET _specee_probe 0 _specee_found_version)
list(GET _specee_probe 1 LLAMA_CPP_PYTHON_SITE)
if(NOT _specee_found_version STREQUAL SPECEE_LLAMA_CPP_PYTHON_VERSION)
  message(FATAL_ERROR "specee-pc: found llama-cpp-python ${_specee_found_version}, needs exactly "
                      "${SPECEE_LLAMA_CPP_PYTHON_VERSION}. ${_specee_install_hint}")
endif()

foreach(_header llama.h ggml.h ggml-backend.h gguf.h)
  if(NOT EXISTS "${LLAMA_CPP_PYTHON_SITE}/include/${_header}")
    message(FATAL_ERROR "specee-pc: ${LLAMA_CPP_PYTHON_SITE}/include/${_header} is missing: this "
                        "llama-cpp-python install has no headers (a prebuilt wheel?). Rebuild it from source: "
                        "pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python==${SPECEE_LLAMA_CPP_PYTHON_VERSION}")
  endif()
endforeach()

list(PREPEND CMAKE_PREFIX_PATH "${LLAMA_CPP_PYTHON_SITE}")
find_package(llama CONFIG QUIET)
if(NOT llama_FOUND)
  message(FATAL_ERROR "specee-pc: no CMake package config for llama under ${LLAMA_CPP_PYTHON_SITE}/lib/cmake. ${_specee_install_hint}")
endif()
if(NOT LLAMA_BUILD_COMMIT STREQUAL SPECEE_LLAMA_CPP_COMMIT)
  message(FATAL_ERROR "specee-pc: llama.cpp commit ${LLAMA_BUILD_COMMIT} found, ${SPECEE_LLAMA_CPP_COMMIT} expected. ${_specee_install_hint}")
endif()
message(STATUS "specee-pc: llama.cpp ${LLAMA_BUILD_COMMIT} from llama-cpp-python ${_specee_found_version} at ${LLAMA_CPP_PYTHON_SITE}")
