#include <stdio.h>
#include "greet.h"

int greet(const char *name)
{
    return printf("hello, %s\n", name);
}
