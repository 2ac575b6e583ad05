#pragma once
#include <stddef.h>
void isal_reference_placeholder(void);
