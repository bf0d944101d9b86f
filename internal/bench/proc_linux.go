package bench

import "syscall"

// childAttr makes a replica die with the bench process, so that none outlives an interrupted run.
func childAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} }
