# Installs the build into a scratch prefix, configures and builds a separate CMake project (SOURCE_DIR) against
# it with find_package(gradiveq), and runs the program it builds (PROGRAM, with the space-separated ARGS), which
# must exit 0, or EXPECT_EXIT when that is given; then, when THEN_ARGS is given, runs it again with those.
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
if(DEFINED EXPECT_EXIT)
  # A run that must fail (a fault drill): its exit code must be EXPECT_EXIT; the output is checked by the test's
  # PASS_REGULAR_EXPRESSION.
  execute_process(COMMAND ${WORK_DIR}/build/${PROGRAM} ${args} RESULT_VARIABLE rc)
  if(NOT rc EQUAL EXPECT_EXIT)
    message(FATAL_ERROR "expected exit code ${EXPECT_EXIT}, got ${rc}: ${PROGRAM} ${ARGS}")
  endif()
else()
  run(${WORK_DIR}/build/${PROGRAM} ${args})
endif()
# A second run of the same program (THEN_ARGS), e.g. one that resumes from the first run's checkpoint.
if(DEFINED THEN_ARGS)
  separate_arguments(then_args UNIX_COMMAND "${THEN_ARGS}")
  run(${WORK_DIR}/build/${PROGRAM} ${then_args})
endif()
