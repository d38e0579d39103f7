# Installs the build into a scratch prefix, configures and builds a separate CMake project (SOURCE_DIR) against
# it with find_package(gradiveq), and runs the program it builds (PROGRAM, with the space-separated ARGS).
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/install)
macro(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endmacro()
run(${CMAKE_COMMAND} --install ${GRADIVEQ_BUILD_DIR} --prefix ${prefix})
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_PREFIX_PATH=${prefix})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
separate_arguments(args UNIX_COMMAND "${ARGS}")
run(${WORK_DIR}/build/${PROGRAM} ${args})
