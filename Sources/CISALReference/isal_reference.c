#include "isal_reference.h"
void isal_reference_placeholder(void) {}
