/* What the C tests share: FAIL records a failed check (file, line, message) and goes on;
 * finish() reports them and gives the exit status. */
#ifndef MOLE_TESTS_C_CHECK_H
#define MOLE_TESTS_C_CHECK_H

#include <stdio.h>

static int failures = 0;

#define FAIL(...)                                                                                  \
  do {                                                                                             \
    fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                           \
    fprintf(stderr, __VA_ARGS__);                                                                  \
    fprintf(stderr, "\n");                                                                         \
    failures++;                                                                                    \
  } while (0)

/* 1 when a check failed (each already printed), else 0 with "<test>: all checks passed". */
static int finish(const char *test) {
  if (failures) {
    fprintf(stderr, "%s: %d failure(s)\n", test, failures);
    return 1;
  }
  printf("%s: all checks passed\n", test);
  return 0;
}

#endif
