// The Communicator over local TCP sockets (communicator.h: socket_listen / socket_accept / socket_connect),
// for a host without MPI. Rank 0 listens on 127.0.0.1, every other rank connects to it and says its rank, and
// every collective goes through rank 0 (a star): the payloads are what a rank group on one host exchanges
// outside the device collectives (steps, set-up; on the CPU also the activations, summed by rank 0 in rank
// order). A rank whose process ends closes its socket, so its peers see it at once; a silent one is caught
// by the timeout.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "rtllm/communicator.h"

namespace rtllm {
namespace {

using Clock = std::chrono::steady_clock;

class SocketCommunicator final : public Communicator {
 public:
  // peers: rank 0's sockets to ranks 1 .. size-1 (index r - 1); another rank's single socket to rank 0.
  SocketCommunicator(int32_t rank, int32_t size, std::vector<int> peers, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), peers_(std::move(peers)), timeout_(timeout) {}
  ~SocketCommunicator() override { close_all(); }

  int32_t rank() const override { return rank_; }
  int32_t size() const override { return size_; }
  void set_timeout(std::chrono::milliseconds timeout) override { timeout_ = timeout; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  void all_reduce_sum(float* data, int64_t count) override {
    const size_t bytes = sizeof(float) * static_cast<size_t>(count);
    if (rank_ == 0) {
      std::vector<float> part(static_cast<size_t>(count));
      for (int32_t r = 1; r < size_; ++r) {  // in rank order: every run sums the same way
        recv_exact(r, part.data(), bytes, "all_reduce_sum", false);
        for (int64_t i = 0; i < count; ++i) data[i] += part[i];
      }
      for (int32_t r = 1; r < size_; ++r) send_exact(r, data, bytes, "all_reduce_sum");
    } else {
      send_exact(0, data, bytes, "all_reduce_sum");
      recv_exact(0, data, bytes, "all_reduce_sum", false);
    }
  }

  int64_t all_reduce_min(int64_t value) override {
    if (rank_ == 0) {
      for (int32_t r = 1; r < size_; ++r) {
        int64_t other = 0;
        recv_exact(r, &other, sizeof(other), "all_reduce_min", false);
        value = std::min(value, other);
      }
      for (int32_t r = 1; r < size_; ++r) send_exact(r, &value, sizeof(value), "all_reduce_min");
    } else {
      send_exact(0, &value, sizeof(value), "all_reduce_min");
      recv_exact(0, &value, sizeof(value), "all_reduce_min", false);
    }
    return value;
  }

  void gather(const float* send, float* recv, int64_t count, int32_t root) override {
    check_root(root, "gather");
    const size_t bytes = sizeof(float) * static_cast<size_t>(count);
    if (rank_ == 0) {
      std::vector<float> all;
      float* out = recv;
      if (root != 0) {
        all.resize(static_cast<size_t>(count) * size_);
        out = all.data();
      }
      std::memcpy(out, send, bytes);
      for (int32_t r = 1; r < size_; ++r) recv_exact(r, out + r * count, bytes, "gather", false);
      if (root != 0) send_exact(root, out, bytes * size_, "gather");
    } else {
      send_exact(0, send, bytes, "gather");
      if (rank_ == root) recv_exact(0, recv, bytes * size_, "gather", false);
    }
  }

  void broadcast(std::vector<uint8_t>* bytes, int32_t root) override { broadcast_bytes(bytes, root, false); }
  void broadcast_wait(std::vector<uint8_t>* bytes, int32_t root) override { broadcast_bytes(bytes, root, true); }

  void barrier() override { all_reduce_min(0); }

  void disconnect() override {
    if (disconnected_) return;
    barrier();
    close_all();
    disconnected_ = true;
  }

 private:
  void check_root(int32_t root, const char* call) const {
    RTLLM_CHECK_ARG(root >= 0 && root < size_, call, ": root ", root, " outside [0, ", size_, ")");
  }

  // Rank 0 relays a root's bytes to the others; the length goes first.
  void broadcast_bytes(std::vector<uint8_t>* bytes, int32_t root, bool wait_forever) {
    check_root(root, "broadcast");
    auto send_all = [&](const std::vector<uint8_t>& b, int32_t skip) {
      const uint64_t n = b.size();
      for (int32_t r = 1; r < size_; ++r) {
        if (r == skip) continue;
        send_exact(r, &n, sizeof(n), "broadcast");
        send_exact(r, b.data(), b.size(), "broadcast");
      }
    };
    auto receive = [&](int32_t from, std::vector<uint8_t>* b) {
      uint64_t n = 0;
      recv_exact(from, &n, sizeof(n), "broadcast", wait_forever);
      b->resize(n);
      recv_exact(from, b->data(), n, "broadcast", false);
    };
    if (rank_ == 0) {
      if (root != 0) receive(root, bytes);
      send_all(*bytes, root);
    } else if (rank_ == root) {
      const uint64_t n = bytes->size();
      send_exact(0, &n, sizeof(n), "broadcast");
      send_exact(0, bytes->data(), bytes->size(), "broadcast");
    } else {
      receive(0, bytes);
    }
  }

  int socket_of(int32_t peer) const { return rank_ == 0 ? peers_.at(peer - 1) : peers_.at(0); }

  void usable(const char* call) const {
    if (!failure_.empty()) throw CommunicatorError(failure_);
    RTLLM_CHECK(!disconnected_, call, ": the group was disconnected");
  }

  [[noreturn]] void fail(const std::string& why) {
    if (failure_.empty()) failure_ = why;
    close_all();
    throw CommunicatorError(failure_);
  }

  void send_exact(int32_t peer, const void* data, size_t n, const char* call) {
    usable(call);
    const int fd = socket_of(peer);
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      const ssize_t sent = ::send(fd, p, n, MSG_NOSIGNAL);
      if (sent < 0 && errno == EINTR) continue;
      if (sent <= 0)
        fail(detail::concat(call, ": rank ", peer, " is gone (", std::strerror(errno), "); the group of ", size_,
                            " ranks is lost"));
      p += sent;
      n -= static_cast<size_t>(sent);
    }
  }

  // wait_forever: no timeout before the first byte (a follower between steps), as long as the peer lives.
  void recv_exact(int32_t peer, void* data, size_t n, const char* call, bool wait_forever) {
    usable(call);
    const int fd = socket_of(peer);
    auto* p = static_cast<uint8_t*>(data);
    const auto deadline = Clock::now() + timeout_;
    bool first = true;
    while (n > 0) {
      pollfd pfd{fd, POLLIN, 0};
      int wait_ms = -1;
      if (!(wait_forever && first)) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        wait_ms = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(left, INT32_MAX)));
      }
      const int ready = ::poll(&pfd, 1, wait_ms);
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0)
        fail(detail::concat(call, ": rank ", peer, " did not answer within ", timeout_.count(),
                            " ms; the group of ", size_, " ranks is lost"));
      const ssize_t got = ::recv(fd, p, n, 0);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0)
        fail(detail::concat(call, ": rank ", peer, " has exited; the group of ", size_, " ranks is lost"));
      p += got;
      n -= static_cast<size_t>(got);
      first = false;
    }
  }

  void close_all() {
    for (int& fd : peers_) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
  }

  const int32_t rank_, size_;
  std::vector<int> peers_;
  std::chrono::milliseconds timeout_;
  std::string failure_;  // why the group is lost; every later call throws it
  bool disconnected_ = false;
};

void configure(int fd) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // small step messages go out at once
}

}  // namespace

int socket_listen(int32_t* port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  RTLLM_CHECK(fd >= 0, "socket_listen: socket failed: ", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;  // any free port
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 64) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    RTLLM_CHECK(false, "socket_listen: cannot listen on 127.0.0.1: ", why);
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

std::shared_ptr<Communicator> socket_accept(int listen_fd, int32_t size, std::chrono::milliseconds timeout) {
  RTLLM_CHECK_ARG(size >= 1, "socket_accept: size ", size, " must be at least 1");
  std::vector<int> peers(static_cast<size_t>(size - 1), -1);
  auto close_peers = [&] {
    for (int fd : peers)
      if (fd >= 0) ::close(fd);
    ::close(listen_fd);
  };
  const auto deadline = Clock::now() + timeout;
  for (int32_t joined = 0; joined < size - 1;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd pfd{listen_fd, POLLIN, 0};
    const int ready = left > 0 ? ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, INT32_MAX))) : 0;
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      close_peers();
      throw CommunicatorError(detail::concat("socket_accept: ", joined, " of ", size - 1, " ranks joined within ",
                                             timeout.count(), " ms"));
    }
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    configure(fd);
    int32_t hello[2] = {-1, -1};  // the joining rank, and the size it was told
    size_t got = 0;
    while (got < sizeof(hello)) {
      pollfd in{fd, POLLIN, 0};
      if (::poll(&in, 1, 5000) <= 0) break;
      const ssize_t n = ::recv(fd, reinterpret_cast<uint8_t*>(hello) + got, sizeof(hello) - got, 0);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    const int32_t r = hello[0];
    if (got != sizeof(hello) || r < 1 || r >= size || hello[1] != size || peers[r - 1] >= 0) {
      ::close(fd);  // not one of ours, or a rank twice: ignored
      continue;
    }
    peers[r - 1] = fd;
    ++joined;
  }
  ::close(listen_fd);
  return std::make_shared<SocketCommunicator>(0, size, std::move(peers), std::chrono::milliseconds(30000));
}

std::shared_ptr<Communicator> socket_connect(int32_t port, int32_t rank, int32_t size,
                                             std::chrono::milliseconds timeout) {
  RTLLM_CHECK_ARG(size >= 2 && rank >= 1 && rank < size, "socket_connect: rank ", rank, " of ", size,
                  " (ranks 1 .. size - 1 connect; rank 0 accepts)");
  RTLLM_CHECK_ARG(port > 0 && port < 65536, "socket_connect: port ", port, " outside (0, 65536)");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    RTLLM_CHECK(fd >= 0, "socket_connect: socket failed: ", std::strerror(errno));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      configure(fd);
      const int32_t hello[2] = {rank, size};
      if (::send(fd, hello, sizeof(hello), MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof(hello)))
        return std::make_shared<SocketCommunicator>(rank, size, std::vector<int>{fd}, std::chrono::milliseconds(30000));
    }
    const std::string why = std::strerror(errno);
    ::close(fd);
    if (Clock::now() > deadline)
      throw CommunicatorError(detail::concat("socket_connect: rank ", rank, " cannot reach rank 0 on port ", port,
                                             " (", why, ")"));
    usleep(20000);
  }
}

}  // namespace rtllm
