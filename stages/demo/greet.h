#ifndef GREET_H
#define GREET_H
/* Writes "hello, NAME" to standard output; returns the number of bytes written. */
int greet(const char *name);
#endif
