// goroutines: many goroutines mixing CPU work, file reads and small syscalls,
// for ~1 s. Each spin runs ~15 ms without a function call, longer than the
// runtime's 10 ms time slice, so with more goroutines than CPUs the runtime
// preempts them asynchronously (SIGURG) many times. The output depends only on
// the flags, never on timing or scheduling:
//
//	goroutines [-n 64] [-iterations 2] [-work 10000000] [-reads 4] [-file /proc/self/stat]
//
// prints "ok goroutines=N iterations=I checksum=HEX". A failed read or a
// wrong result prints "error: ..." and exits 1.
package main

import (
	"flag"
	"fmt"
	"os"
	"sync"
	"syscall"
)

// spin is deterministic CPU work with no function calls inside the loop, so
// only asynchronous preemption (SIGURG) can interrupt it.
func spin(seed uint64, steps int) uint64 {
	x := seed | 1
	for i := 0; i < steps; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
	}
	return x
}

// splitmix64 spreads small seeds over all 64 bits (xorshift is linear, so
// seeds that differ in a few bits would give correlated results).
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func main() {
	goroutines := flag.Int("n", 64, "number of goroutines")
	iterations := flag.Int("iterations", 2, "iterations per goroutine")
	work := flag.Int("work", 10000000, "xorshift steps per iteration")
	reads := flag.Int("reads", 4, "file reads (and getpid, getcwd) per iteration")
	path := flag.String("file", "/proc/self/stat", "file to read")
	flag.Parse()

	results := make([]uint64, *goroutines)
	errs := make([]error, *goroutines)
	var wg sync.WaitGroup
	for g := 0; g < *goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			sum := uint64(0)
			cwd := make([]byte, 4096)
			for i := 0; i < *iterations; i++ {
				sum += spin(splitmix64(uint64(g)<<32|uint64(i)), *work)
				for r := 0; r < *reads; r++ {
					data, err := os.ReadFile(*path)
					if err != nil {
						errs[g] = err
						return
					}
					if len(data) == 0 {
						errs[g] = fmt.Errorf("%s is empty", *path)
						return
					}
					if syscall.Getpid() != os.Getpid() {
						errs[g] = fmt.Errorf("getpid changed")
						return
					}
					if _, err := syscall.Getcwd(cwd); err != nil {
						errs[g] = err
						return
					}
				}
			}
			results[g] = sum
		}(g)
	}
	wg.Wait()

	checksum := uint64(0)
	for g := range results {
		if errs[g] != nil {
			fmt.Printf("error: goroutine %d: %v\n", g, errs[g])
			os.Exit(1)
		}
		checksum = checksum*0x100000001b3 + results[g]
	}
	fmt.Printf("ok goroutines=%d iterations=%d checksum=%016x\n", *goroutines, *iterations, checksum)
}
