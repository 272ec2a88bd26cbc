# ctest: the consumer linked against dynq::dynq loads libdynq through its SONAME, and the one
# linked against dynq::dynq_static does not need libdynq at all.
#
#   cmake -DSHARED_EXE=<exe> -DSTATIC_EXE=<exe> -DSONAME=<libdynq.so.x.y> -DREADELF=readelf
#         -P check_linkage.cmake
cmake_policy(VERSION 3.16)
foreach(v SHARED_EXE STATIC_EXE SONAME READELF)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check_linkage.cmake: -D${v}= is required")
  endif()
endforeach()
execute_process(COMMAND "${READELF}" -d "${SHARED_EXE}" OUTPUT_VARIABLE shared_dyn)
execute_process(COMMAND "${READELF}" -d "${STATIC_EXE}" OUTPUT_VARIABLE static_dyn)
string(REGEX MATCHALL "\\(NEEDED\\)[^\n]*\\[[^]]+\\]" shared_needed "${shared_dyn}")
string(REGEX MATCHALL "\\(NEEDED\\)[^\n]*\\[[^]]+\\]" static_needed "${static_dyn}")
if(NOT shared_needed MATCHES "\\[${SONAME}\\]")
  message(FATAL_ERROR "${SHARED_EXE} does not need ${SONAME}: ${shared_needed}")
endif()
if(static_needed MATCHES "libdynq")
  message(FATAL_ERROR "${STATIC_EXE} needs a shared libdynq: ${static_needed}")
endif()
message(STATUS "shared consumer needs ${SONAME}; static consumer needs no libdynq")
