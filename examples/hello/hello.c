#include <stdio.h>

int main(void) {
    puts("hello from a kata-ci microVM");
    return 0;
}
